"""`zgrid-ctl dashboard`: a live picture of the grid one node knows, in the browser.

feed.py follows the node (read-only control requests, in two threads); app.py serves the page
and streams the feed to it (Starlette + uvicorn, the `[web]` extra); static/ holds the page,
its script and the vendored JavaScript libraries (see static/vendor/VENDOR.md).
"""
