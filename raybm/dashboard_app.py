"""Script that `raybm dashboard` hands to `streamlit run` (same as dashboards/app.py)."""

from raybm.dashboard import main

main()
