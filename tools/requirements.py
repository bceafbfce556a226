"""Print meshq's requirements (setup.cfg ``install_requires`` and the named extras), one a
line, leaving out the packages named with ``--without``.

``make install-vllm`` installs meshq into ``.venv-vllm`` with ``--no-deps`` and then these,
so meshq's own ``torch`` pin (for the default install) never replaces the torch that
vLLM was built against.

    python tools/requirements.py --extras test --without torch

``--freeze`` prints instead the exact version of every package installed here but those
named with ``--without``: ``make upgrade-pins`` writes it to ``constraints.txt``, which
``make install`` installs with.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+")


def requirements(extras: list[str], without: set[str]) -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    kept = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        match = _NAME_RE.match(line)
        name = match.group(0).lower() if match else ""
        if name.split("[")[0] not in without:
            kept.append(line)
    return kept


def frozen(without: set[str]) -> list[str]:
    """``name==version`` of every installed distribution but those named in ``without``."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name not in without:
            pins[name] = f"{name}=={dist.version}"
    return [pins[name] for name in sorted(pins)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extras", nargs="*", default=[])
    parser.add_argument("--without", nargs="*", default=[])
    parser.add_argument("--freeze", action="store_true")
    args = parser.parse_args()
    without = {name.lower() for name in args.without}
    if args.freeze:
        header = "# Versions `make test` last passed with (make upgrade-pins rewrites this file).\n"
        print(header + "\n".join(frozen(without)))
        return
    print("\n".join(requirements(args.extras, without)))


if __name__ == "__main__":
    main()
