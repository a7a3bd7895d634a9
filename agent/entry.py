"""The `stoker-agent` command. Kept apart from `stoker.agent.main` so that an install
without the agent's extra (`pip install stoker`) says what is missing instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Top-level modules that only the `agent` extra installs.
AGENT_EXTRA_MODULES = frozenset({"torch", "safetensors", "diffusers", "transformers", "PIL", "scipy", "open_clip",
                                 "accelerate", "numpy"})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from stoker.agent import main as agent_main
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in AGENT_EXTRA_MODULES:
            raise
        print(f"stoker-agent: the agent needs {error.name}, which is not installed; "
              "install the agent with: pip install 'stoker[agent]'", file=sys.stderr)
        return 2
    return agent_main.main(argv)
