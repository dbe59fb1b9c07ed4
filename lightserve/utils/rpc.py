"""rpyc settings shared by every process that serves or calls an rpyc service.

Kept apart from the services themselves so that light processes (router, cache manager) can
read them without importing the model code (and torch) behind a backend rank.
"""

from __future__ import annotations

# rpyc hardening: only `exposed_` methods are reachable, no attribute access, no pickles.
RPYC_CONFIG = {
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_pickle": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "sync_request_timeout": None,
}
