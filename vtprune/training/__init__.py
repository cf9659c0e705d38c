"""Training tools for methods that learn something (DyVTE's exit routers); never run at import or in a forward."""
