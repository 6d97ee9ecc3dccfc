"""Which node may be which source: the operator's binding of node identities to source ids.

With SuperNode authentication, the SuperLink gives every registered public key a fixed
node id (``flwr supernode register`` prints it). ``deploy/keys.sh --register`` records
that id with the key's NAME, the source id, in ``node-sources.json``::

    {"8412345566123": "hospital-a", "99120033": "hospital-b"}

and the ServerApp (run-config ``node-sources`` = that file's path on the SuperLink's
machine) trains a node only as the source it is bound to. Node authentication proves a
node holds a registered key; this binding decides which source that key speaks for.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.pool import InvalidSourceError, validate_source

__all__ = ["NodeSourcesError", "load_node_sources"]

MAX_FILE_BYTES = 1 << 20


class NodeSourcesError(ValueError):
    """The ``node-sources`` file is missing or not a JSON object of node ids to source ids."""


def load_node_sources(path: str | Path) -> dict[int, str]:
    """``{node id: source}`` from a ``node-sources`` JSON file; raises ``NodeSourcesError``."""
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()[:MAX_FILE_BYTES + 1]
        document = json.loads(text) if len(text) <= MAX_FILE_BYTES else None
    except (OSError, ValueError) as err:
        raise NodeSourcesError(f"node-sources file {path} is unreadable ({err}); write it with "
                               "deploy/keys.sh --register, or leave node-sources empty") from err
    if not isinstance(document, dict):
        raise NodeSourcesError(f"node-sources file {path} must hold a JSON object {{\"<node id>\": \"<source>\"}} "
                               f"of at most {MAX_FILE_BYTES} bytes")
    bindings: dict[int, str] = {}
    for node, source in document.items():
        if not node.isdigit() or not isinstance(source, str):
            raise NodeSourcesError(f"node-sources file {path}: entry {node[:40]!r} must map a numeric node id to "
                                   "a source id string")
        try:
            bindings[int(node)] = validate_source(source)
        except InvalidSourceError as err:
            raise NodeSourcesError(f"node-sources file {path}: {err}") from err
    return bindings
