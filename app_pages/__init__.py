"""The app's pages (one screen each, registered with ``st.navigation`` in ``app.py``) and ``_ui``,
their shared helpers. Named ``app_pages`` rather than ``pages``: Streamlit treats a ``pages/``
folder beside the entry script as a legacy multipage app and would run a page file without
``app.py`` (no sidebar, no run picker), both in ``AppTest`` and on a fresh server."""
