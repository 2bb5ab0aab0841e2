"""`moefold report`: one HTML page of charts (matplotlib) from one or more run folders.

`moefold.report.page.build_report` writes it; matplotlib is imported only there (the `report`
extra), so the CLI loads without it.
"""
