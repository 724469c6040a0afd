"""The raybm dashboard: streamlit run dashboards/app.py -- --root results [--serve-url URL]"""

from raybm.dashboard.pages import main

main()
