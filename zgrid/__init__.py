"""zgrid: a decentralized electrical grid of peer-to-peer nodes on ZeroMQ.

What a program uses, in one place:

    import zgrid
    with zgrid.Client("tcp://127.0.0.1:5001") as node:     # talk to a running node
        print(node.status()["total_net"])
    result = zgrid.run_scenario(zgrid.Scenario(nodes=1000))  # the simulator (zgrid[sim])

and the errors (`zgrid.ZgridError` and its subclasses). docs/design.md says which module
holds what. The client and the simulator are imported on first use, so `import zgrid` (or
`import zgrid.core`, which the simulator and the runtime share) loads no sockets and no
simulator dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zgrid.errors import (
    ControlError,
    NoReply,
    ProtocolError,
    SecurityError,
    StorageFailure,
    StoreError,
    ZgridError,
)

__version__ = "0.3.0"

if TYPE_CHECKING:
    from zgrid.client import Client
    from zgrid.sim import Scenario, Simulator, converged_sim, run_scenario

_LAZY = {
    "Client": "zgrid.client",
    "Scenario": "zgrid.sim",
    "Simulator": "zgrid.sim",
    "converged_sim": "zgrid.sim",
    "run_scenario": "zgrid.sim",
}

__all__ = [
    "Client",
    "ControlError",
    "NoReply",
    "ProtocolError",
    "Scenario",
    "SecurityError",
    "Simulator",
    "StorageFailure",
    "StoreError",
    "ZgridError",
    "__version__",
    "converged_sim",
    "run_scenario",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zgrid' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
