"""Tables and figures drawn from JSON-lines logs only (never from models)."""
