"""Names and bounds of the model registry, shared by its request schemas (app/schemas/registry.py)
and its service (app/services/registry.py). Constants only: the Python client imports the schemas
and must not pull in the database layer with them."""

from __future__ import annotations

# URL-safe, so a name or alias sits in a path as it is; "@" and "/" separate the parts of a reference.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_NAME = 64
MAX_CLUSTER_NAME = 100
MAX_DESCRIPTION = 2000
# A reference in a path: ``name`` or ``name@alias`` (``name/versions/N`` has routes of its own).
REFERENCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"
