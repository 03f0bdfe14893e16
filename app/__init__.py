"""The Streamlit front end of tda-explorer: navigation, pages and shared widgets, no math."""
