"""Print pip constraints pinning every dependency of pyproject.toml (and of the given extras) at its lower bound.

Usage: python .ci/floor_constraints.py dev,demo,eval,lm-eval > floor.txt
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in filter(None, (sys.argv[1] if len(sys.argv) > 1 else "").split(",")):
    requirements += project["optional-dependencies"][extra]
pins = {}
for requirement in requirements:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", requirement)
    name, spec = match.group(1).lower().replace("_", "-"), match.group(2)
    floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    if floor:
        pins[name] = floor.group(1)
for name, version in sorted(pins.items()):
    print(f"{name}=={version}")
