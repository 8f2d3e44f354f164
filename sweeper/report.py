"""Stub: being written."""
def print_report(study_name, storage_url, tracking_uri, fmt="table"):
    print("report for", study_name)
