"""The docs' links: every relative link in README.md and docs/*.md names a file that exists, and
every `#anchor` names a heading of its file (GitHub's anchors), so a renamed heading or a moved
figure fails here instead of in a reader's browser."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def github_anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(text):
    """The text outside fenced code blocks (a `# comment` in a script is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def headings(path, levels=range(1, 7)):
    """The anchors of a file's headings at the given levels, in order (repeated ones numbered)."""
    found, seen = [], {}
    for hashes, heading in re.findall(r"^(#{1,6}) (.+)$", prose(path.read_text()), flags=re.M):
        a = github_anchor(heading)
        n = seen.get(a, 0)
        seen[a] = n + 1
        if len(hashes) in levels:
            found.append(f"{a}-{n}" if n else a)
    return found


def test_github_anchor_known_answers():
    assert github_anchor("Zigzag arms are §4.4's negative eigendirections (beyond the paper)") == \
        "zigzag-arms-are-44s-negative-eigendirections-beyond-the-paper"
    assert github_anchor("Controls and ablations (`--sweep`)") == "controls-and-ablations---sweep"
    assert github_anchor("Mamba (`exp_mamba.py`, App. C.1)") == "mamba-exp_mambapy-app-c1"


def test_headings_known_answers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n## Results\n\n```bash\n# a comment\n```\n\n### Results\n\n## Results\n")
    assert headings(doc) == ["title", "results", "results-1", "results-2"]  # GitHub numbers repeats
    assert headings(doc, levels=(3,)) == ["results-1"]


def test_every_relative_link_resolves():
    broken, anchors = [], {}  # each linked file's headings, read once
    for doc in DOCS:
        for target in LINK.findall(prose(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md":
                if dest not in anchors:
                    anchors[dest] = set(headings(dest))
                if anchor not in anchors[dest]:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_contents_lists_every_section():
    """A doc's "Contents:" list names each of its sections and subsections, in order, so a new
    section cannot be left out of it."""
    with_contents = [doc for doc in DOCS[1:] if "\nContents:\n" in doc.read_text()]
    assert {doc.name for doc in with_contents} >= {"results.md", "performance.md"}
    for doc in with_contents:
        block = doc.read_text().split("\nContents:\n", 1)[1].strip().split("\n\n", 1)[0]
        listed = re.findall(r"^\s*- \[[^\]]*\]\(#([^)]+)\)", block, flags=re.M)
        sections = headings(doc, levels=(2, 3))
        missing, extra = set(sections) - set(listed), set(listed) - set(sections)
        order = "" if missing or extra else ", or out of order"
        assert listed == sections, f"{doc.name}: missing {sorted(missing)}, extra {sorted(extra)}{order}"
