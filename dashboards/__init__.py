"""The Streamlit explorer of the pipeline's outputs (`streamlit run dashboards/app.py`)."""
