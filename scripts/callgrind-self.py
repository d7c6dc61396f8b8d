#!/usr/bin/env python3
"""Own (self) instructions per function in a callgrind output file, the top N, divided by
a number of frames: `callgrind-self.py FILE FRAMES [N]`. (callgrind_annotate 3.19 attributes
every cost to main on dumps taken with callgrind_control; this reads the file directly.)"""
import re
import sys
from collections import Counter

path, frames = sys.argv[1], int(sys.argv[2])
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
names, self_cost = {}, Counter()
fn, skip_next = None, False
name_re = re.compile(r"^\((\d+)\)(?: (.*))?$")


def resolve(spec):
    m = name_re.match(spec)
    if not m:
        return spec
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), spec)


with open(path, errors="replace") as f:
    for line in f:
        line = line.rstrip("\n")
        if line.startswith("fn="):
            fn = resolve(line[3:])
        elif line.startswith(("cfn=", "cfi=", "cfl=")):
            if line.startswith("cfn="):
                resolve(line[4:])
        elif line.startswith("calls="):
            skip_next = True
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            if skip_next:
                skip_next = False
                continue
            parts = line.split()
            if len(parts) >= 2 and fn is not None:
                self_cost[fn] += int(parts[1])
total = sum(self_cost.values())
print(f"total {total} instructions, {total / frames:.0f} per frame")
for name, cost in self_cost.most_common(top):
    short = re.sub(r"\b[a-z_]+::", "", name)[:150]
    print(f"{cost / frames:8.0f}  {100 * cost / total:5.1f}%  {short}")
