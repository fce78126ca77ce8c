"""Command line: `tracer attribute | estimate | prune | score | fixture | intervene | validate |
sweep | features show | features export | label`.

Commands import what they need when they run, so `tracer --help` loads no torch.
"""

from __future__ import annotations

import sys

from tracer.cli import feature_commands, graph_commands, intervention_commands, sweep_commands
from tracer.cli.parser import build_parser
from tracer.memory import return_freed_memory

COMMANDS = {
    "attribute": graph_commands.attribute,
    "estimate": graph_commands.estimate,
    "prune": graph_commands.prune,
    "score": graph_commands.score,
    "fixture": graph_commands.fixture,
    "intervene": intervention_commands.intervene,
    "validate": intervention_commands.validate,
    "sweep": sweep_commands.sweep,
    "label": feature_commands.label,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a process-wide allocator setting, chosen by the program (not the library): freed
    # temporaries go back to the system, so peaks mean what they say (tracer.memory)
    return_freed_memory()
    try:
        if args.command == "features":
            getattr(feature_commands, args.features_command)(args)
        else:
            COMMANDS[args.command](args)
    except (ValueError, OSError, IndexError) as err:  # OSError: missing files, also of transformers
        print(f"tracer {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
