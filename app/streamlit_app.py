"""facecheck dashboard. Run from the repository root with `streamlit run app`.

This script runs on every interaction: it sets the session defaults, draws the sidebar (sample and
models), brings the evaluation up to date (cached: only new models or a new sample cost time), then
hands over to the selected page. The pages only draw; every number comes from `analysis`.
"""

import sys
from pathlib import Path

# `streamlit run app` puts app/ on sys.path, not the repository, which holds `analysis` and `app`.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import streamlit as st  # noqa: E402

from app import state  # noqa: E402
from app.layout import render_demo_banner  # noqa: E402
from app.sidebar import render_sidebar  # noqa: E402

st.set_page_config(page_title="facecheck · age & gender models", page_icon="🧑", layout="wide")
state.init_session()

page = st.navigation(
    [
        st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
        st.Page("views/slices.py", title="Slices", icon=":material/bar_chart:"),
        st.Page("views/errors.py", title="Errors", icon=":material/image_search:"),
        st.Page("views/export.py", title="Export", icon=":material/download:"),
    ],
    position="top",
)
render_sidebar()
render_demo_banner()
st.session_state["current"] = state.evaluate_current(st.empty())
page.run()
