"""The Streamlit dashboard: `streamlit run app` opens app/streamlit_app.py.

streamlit_app.py  navigation, session defaults, sidebar, evaluation of the current choices
sidebar.py        sample and model inputs, what the loader inferred, overrides
state.py          session state and the cached calls into `analysis`
uploads.py        checks and per-session storage of uploaded files (no streamlit)
gallery.py        which cases the Errors page shows (no streamlit)
wording.py        numbers into plain words (no streamlit)
layout.py         pieces every page draws the same way
views/            one script per page: overview, slices, errors, export
"""
