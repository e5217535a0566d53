"""Thin HTTP routers: parse, authorize, call one service function, return a view."""
