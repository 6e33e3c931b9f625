"""Fails at import, as a plugin with a missing dependency does."""

import adapterswap_dependency_that_does_not_exist  # noqa: F401
