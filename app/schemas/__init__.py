"""Request and response bodies of API v1 (pydantic), one module per resource."""
