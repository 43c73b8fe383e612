"""The gateway: the control API, HLS routing and the web pages."""
