"""Export: the whole report bundle as one zip, and each table and figure on its own."""

import streamlit as st

from analysis import figures
from app import layout, state

TABLE_COLUMNS = 3


def render_bundle(current) -> None:
    st.markdown("#### Report bundle")
    st.caption(
        "One zip: README, every table (CSV, Markdown, LaTeX), every figure (PNG, SVG), Grad-CAM grids of the "
        "worst faces, summary.json, models.json, skipped.csv and provenance.json (model hashes and settings, "
        "sample fingerprint, seed, package versions)."
    )
    with_gradcam = st.toggle("Include Grad-CAM grids", value=True, key="bundle_gradcam")
    bundle = state.stored_bundle(current, with_gradcam)
    if bundle is None and st.button("Build the report bundle", type="primary", key="build_bundle"):
        bar = st.progress(0.0, text="Building the report…")

        def show_progress(done: int, total: int) -> None:
            bar.progress(done / max(total, 1), text=f"Building the report: {done} of {total} figures")

        try:
            bundle = state.build_bundle(current, with_gradcam, show_progress)
        except Exception as exc:  # report writing touches TF, vl-convert and the disk; keep the page alive
            st.error(f"The report could not be built: {exc}")
        finally:
            bar.empty()
    if bundle is not None:
        st.download_button(
            f"Download facecheck_report.zip ({len(bundle) / 1e6:.1f} MB)",
            data=bundle,
            file_name="facecheck_report.zip",
            mime="application/zip",
            type="primary",
            icon=":material/download:",
            on_click="ignore",
            key="download_bundle",
        )


def render_tables(current) -> None:
    evaluation = current.evaluation
    st.markdown("#### Tables (CSV, full precision)")
    tables = {"predictions": evaluation.predictions, **evaluation.tables, "skipped": evaluation.skipped}
    key = state.tables_key(current)
    columns = st.columns(TABLE_COLUMNS)
    for i, (name, table) in enumerate(tables.items()):
        columns[i % TABLE_COLUMNS].download_button(
            f"{name}.csv · {len(table):,} rows",
            data=state.table_csv(key, name, table),
            file_name=f"{name}.csv",
            mime="text/csv",
            on_click="ignore",
            key=f"table_{name}",
            width="stretch",
        )


def render_figures(current) -> None:
    st.markdown("#### Figures")
    key = state.report_key(current)
    by_name = {figure.name: figure for figure in state.report_figures(key, current.evaluation)}
    name = st.selectbox("Figure", list(by_name), format_func=lambda n: f"{n} — {by_name[n].caption}", key="export_figure")
    figure = by_name[name]
    png, svg = st.columns(2)
    # Rendered when clicked (a callable, run outside the page script): rendering the shown figure
    # to PNG and SVG on every visit made the first switch to this page ~1 s slower.
    png.download_button(
        "Download PNG", data=lambda: figures.chart_png(figure.chart), file_name=f"{name}.png",
        mime="image/png", on_click="ignore", key="figure_png", width="stretch",
    )
    svg.download_button(
        "Download SVG", data=lambda: figures.chart_svg(figure.chart).encode("utf-8"), file_name=f"{name}.svg",
        mime="image/svg+xml", on_click="ignore", key="figure_svg", width="stretch",
    )
    layout.show_chart(current, f"report:{name}", lambda: figure.chart)


current = layout.require_evaluation()
st.title("Export")
layout.render_setup_caption(current)
render_bundle(current)
st.divider()
render_tables(current)
st.divider()
render_figures(current)
