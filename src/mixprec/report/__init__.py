"""The report of an apply: its data model, how it is built from a plan, and the HTML page."""
