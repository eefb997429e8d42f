import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def figure_ok(path, min_width=300, min_height=200):
    """A PNG a person can read: at least this many pixels and not blank (many distinct colours)."""
    import matplotlib.image
    import numpy as np
    img = matplotlib.image.imread(str(path))
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    return img.shape[1] >= min_width and img.shape[0] >= min_height and len(colours) > 16


def untimed(obj, drop=("time_s", "wall_time_s")):
    """obj (metrics, rows, histories) without the fields named in `drop` at any depth: by default the
    wall-clock ones, the one thing two runs of the same thing may differ in."""
    if isinstance(obj, dict):
        return {k: untimed(v, drop) for k, v in obj.items() if k not in drop}
    return [untimed(v, drop) for v in obj] if isinstance(obj, list) else obj


def guide_keys(heading):
    """docs/reading_a_run.md: {key: its second column} of the first table under the heading `heading`
    (any level); a row may name several keys, each in backticks, in its first column."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = open(os.path.join(root, "docs", "reading_a_run.md")).read().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("#") and line.lstrip("#").strip() == heading)
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return {key: row.split("|")[2].strip() for row in lines[first + 2: end]
            for key in re.findall(r"`([^`]+)`", row.split("|")[1])}


def guide_top_keys(script):
    """The top-level keys docs/reading_a_run.md names (in backticks) for `script`'s metrics.json, with the
    three every script writes."""
    return set(re.findall(r"`([^`]+)`", guide_keys("The other scripts")[script])) | {"config", "device",
                                                                                    "wall_time_s"}
