"""The Streamlit dashboard: its pages and the results they read."""
