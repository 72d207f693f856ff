"""Read py-spy's collapsed stacks (``bench/fanout.py --profile``), print where the samples went, draw a flame graph.

Each sample is put in one group by its stack, so the groups add up to the whole:

* socket send syscalls: the innermost frame is libc's ``send``/``sendmsg`` (the kernel's work inside them counts
  here, as the sampled thread is running it);
* GC: the cyclic collector is anywhere on the stack;
* encoding: ``messages.encode`` (with orjson and cattrs' unstructuring under it) or ``text_frame`` is on the stack;
* otherwise the innermost frame that names a part: outbox/queueing (``fluxrt_trio/outbox.py``), fan-out loop
  (``LocalHub._fan_out`` and the per-recipient ``deliver_nowait``), Trio scheduling (``trio/``); anything else is
  "other".

Samples whose innermost frame is ``epoll_wait`` are the event loop waiting for work; py-spy cannot tell an idle wait
from a ``timeout=0`` poll, so they are reported apart and left out of the shares.

    .venv/bin/python bench/profiles/flamegraph.py /tmp/prof/fluxrt-round1.txt --svg bench/profiles/paced.svg
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from collections import Counter
from pathlib import Path

IDLE = "idle wait (epoll_wait)"
GROUPS = ["encoding", "fan-out loop", "outbox/queueing", "socket send syscalls", "Trio scheduling", "GC", "other"]
COLOURS = {
    "encoding": "#e6a23c",
    "fan-out loop": "#f56c6c",
    "outbox/queueing": "#b37feb",
    "socket send syscalls": "#409eff",
    "Trio scheduling": "#67c23a",
    "GC": "#909399",
    "other": "#d3b88c",
    IDLE: "#eeeeee",
}
_SEND = re.compile(r"^(__libc_)?(send|sendmsg|__send|__sendmsg)\b.*\(libc")
_GC = ("gc_collect", "collect_main", "collect_generations", "collect_with_callback")
_ENCODING = (
    "encode (fluxrt_trio/protocol/messages.py",
    "text_frame (fluxrt_trio/protocol/frames.py",
    "<cattrs generated unstructure",
)


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """Collapsed stacks (``outer;...;inner count`` per line) as a counter of frame tuples, outermost first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def group(stack: tuple[str, ...]) -> str:
    """The group of one sample, as the module docstring describes."""
    leaf = stack[-1]
    if leaf.startswith("epoll_wait "):
        return IDLE
    if _SEND.match(leaf):
        return "socket send syscalls"
    if any(marker in frame for frame in stack for marker in _GC):
        return "GC"
    if any(frame.startswith(_ENCODING) for frame in stack):
        return "encoding"
    for frame in reversed(stack):
        if "fluxrt_trio/outbox.py" in frame:
            return "outbox/queueing"
        if frame.startswith(("LocalHub._fan_out ", "Connection.deliver_nowait ")):
            return "fan-out loop"
        if "trio/" in frame and "fluxrt_trio/" not in frame:
            return "Trio scheduling"
        if "fluxrt_trio/" in frame:
            return "other"
    return "other"


def self_frames(stacks: Counter[tuple[str, ...]], top: int) -> list[tuple[str, str, int]]:
    """The `top` innermost frames by samples, with their group."""
    by_leaf: Counter[tuple[str, str]] = Counter()
    for stack, count in stacks.items():
        by_leaf[(stack[-1], group(stack))] += count
    return [(frame, grp, count) for (frame, grp), count in by_leaf.most_common(top) if grp != IDLE]


def report(stacks: Counter[tuple[str, ...]], top: int) -> str:
    """The table of groups (share of the non-idle samples) and the heaviest innermost frames."""
    groups: Counter[str] = Counter()
    for stack, count in stacks.items():
        groups[group(stack)] += count
    busy = sum(count for grp, count in groups.items() if grp != IDLE)
    lines = [f"samples: {busy} busy, {groups[IDLE]} {IDLE} (left out)", ""]
    lines += ["| group | samples | share |", "|---|---:|---:|"]
    for grp in GROUPS:
        lines.append(f"| {grp} | {groups[grp]} | {100 * groups[grp] / busy:.1f}% |")
    lines += ["", "| innermost frame (self time) | group | share |", "|---|---|---:|"]
    for frame, grp, count in self_frames(stacks, top + 1):
        lines.append(f"| `{frame}` | {grp} | {100 * count / busy:.1f}% |")
    return "\n".join(lines)


class _Node:
    __slots__ = ("children", "count", "group")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.count = 0
        self.group = "other"


def svg(stacks: Counter[tuple[str, ...]], title: str, min_share: float) -> str:
    """A flame graph (root at the bottom) of the non-idle samples; frames narrower than `min_share` of the whole are
    left out to keep the file small. Each frame's colour is the group of the heaviest sample passing through it."""
    root = _Node()
    heaviest: dict[int, int] = {}
    for stack, count in stacks.items():
        grp = group(stack)
        if grp == IDLE:
            continue
        node = root
        node.count += count
        for frame in stack:
            node = node.children.setdefault(frame, _Node())
            node.count += count
            if count > heaviest.get(id(node), 0):
                heaviest[id(node)] = count
                node.group = grp
    width, row, pad = 1200, 16, 30
    rects: list[str] = []
    depth_max = 0

    def draw(node: _Node, name: str, x: float, depth: int) -> None:
        nonlocal depth_max
        w = width * node.count / root.count
        if node.count / root.count < min_share:
            return
        depth_max = max(depth_max, depth)
        share = 100 * node.count / root.count
        label = html.escape(name)
        text = html.escape(name[: int(w / 7)]) if w > 21 else ""
        rects.append(
            f'<g><title>{label} ({node.count} samples, {share:.2f}%)</title><rect x="{x:.1f}" y="-{(depth + 1) * row}" '
            f'width="{w:.1f}" height="{row - 1}" fill="{COLOURS[node.group]}"/>'
            f'<text x="{x + 3:.1f}" y="-{depth * row + 4}">{text}</text></g>'
        )
        for child_name, child in sorted(node.children.items()):
            draw(child, child_name, x, depth + 1)
            x += width * child.count / root.count

    draw(root, f"all ({root.count} busy samples)", 0.0, 0)
    height = (depth_max + 2) * row + 2 * pad
    legend = "".join(
        f'<rect x="{10 + i * 170}" y="{pad - 22}" width="12" height="12" fill="{COLOURS[g]}"/>'
        f'<text x="{26 + i * 170}" y="{pad - 12}">{html.escape(g)}</text>'
        for i, g in enumerate(GROUPS)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
        f'font-size="11">\n<text x="10" y="{height - 8}">{html.escape(title)}</text>{legend}\n'
        f'<g transform="translate(0,{height - pad})">\n' + "\n".join(rects) + "\n</g></svg>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stacks", type=Path, nargs="+", help="py-spy raw (collapsed) output files, summed")
    parser.add_argument("--svg", type=Path, help="write the flame graph here")
    parser.add_argument("--title", default="", help="caption of the flame graph")
    parser.add_argument("--min-share", type=float, default=0.002, help="leave out frames below this share")
    parser.add_argument("--top", type=int, default=25, help="innermost frames listed")
    args = parser.parse_args(argv)
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in args.stacks:
        stacks.update(read_stacks(path))
    print(report(stacks, args.top))
    if args.svg:
        args.svg.write_text(svg(stacks, args.title or ", ".join(p.name for p in args.stacks), args.min_share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
