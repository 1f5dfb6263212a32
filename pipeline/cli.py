"""`duquant-packs`: build, check and inspect DuQuant pack bundles.

Every expected failure is one sentence on stderr and a non-zero exit (2 for bad input,
1 for a bundle that does not verify), never a traceback. This module holds the command
group; the commands live by job in `cli_build.py` (build), `cli_bundles.py` (verify,
inspect) and `cli_inputs.py` (list-layers, configs, demo-checkpoint), what they share in
`cli_common.py`.
"""

from __future__ import annotations

import click
from duquant_runtime import __version__

from .cli_build import build
from .cli_bundles import inspect, verify
from .cli_inputs import configs, demo_checkpoint, demo_stats, list_layers


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="duquant-packs")
def main() -> None:
    """Build DuQuant W4A8 pack bundles offline, once, and check them before they are used.

    \b
    Typical flow:
      duquant-packs list-layers -c llm_w4a8 --ckpt /ckpt/pi05_libero     # dry run
      duquant-packs build       -c llm_w4a8 --ckpt /ckpt/pi05_libero     # -> artifacts/llm_w4a8/llm_w4a8-<fp12>.h5
      duquant-packs verify artifacts/llm_w4a8/llm_w4a8-<fp12>.h5 -c llm_w4a8 --ckpt /ckpt/pi05_libero

    A bundle's fingerprint binds it to the exact config and checkpoint it was built from.
    """


for command in (build, list_layers, verify, inspect, configs, demo_checkpoint, demo_stats):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
