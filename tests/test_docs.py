"""README.md and docs/*.md: every relative link resolves (to a file, and for #anchors to a heading of that page, by
GitHub's anchor rule), every figure in docs/img/ is shown or linked by a page, and what a page names in code exists:
results files, `python -m benchmarks.<area>.<name>` modules, and `8e5db1a:benchmarks/results/OLD` citations (runs git
keeps, never one that was kept under a new name), and `dsv3/...` source paths. The other way round, every
`docs/PAGE.md#anchor` that code, tests and benchmarks cite in place of a measurement or a reference exists.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import results as writer

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RESULTS = REPO / "benchmarks" / "results"
OLD_REV = "8e5db1a"  # the last commit of the flat results layout

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$", re.M)
OLD_CITATION = re.compile(OLD_REV + r":(benchmarks/results/[\w.\-]+\.\w+)")  # a file name: "OLDNAME" is prose


def prose(page: Path) -> str:
    """The page without fenced code blocks (a link or heading inside one is text, not markup)."""
    return FENCE.sub("", page.read_text())


def anchors(page: Path) -> set[str]:
    """GitHub's anchors: the heading's text lower-cased, punctuation dropped, spaces to '-'; repeats get -1, -2."""
    seen, out = {}, set()
    for heading in HEADING.findall(prose(page)):
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(CODE.sub("", prose(page)))


def test_github_anchor_rule():
    page = REPO / "docs" / "architecture.md"
    assert "config-fields" in anchors(page) and "multi-head-latent-attention" in anchors(page)
    assert "pretraining-dsv3-train" in anchors(REPO / "docs" / "training.md")  # "# Pretraining: `dsv3 train`"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        for target in links(page):
            path = target.partition("#")[0]
            file = (page.parent / path).resolve() if path else page
            if file.suffix == ".md" and file.is_relative_to(REPO / "docs") and file not in reached and file.exists():
                reached.add(file)
                todo.append(file)
    assert not [p.name for p in PAGES[1:] if p not in reached]


def test_every_figure_is_used_by_a_page():
    used = {(page.parent / t.partition("#")[0]).resolve() for page in PAGES for t in links(page)}
    figures = sorted(p for p in (REPO / "docs" / "img").rglob("*") if p.is_file())
    assert not [str(p.relative_to(REPO)) for p in figures if p.resolve() not in used]


def named_in_code(page: Path) -> list[str]:
    """The words of the page's inline code spans."""
    return [word for span in CODE.findall(prose(page)) for word in span.split()]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_named_results_files_exist(page):
    kept = {p.name: p for p in RESULTS.rglob("*.json")}
    missing = []
    for word in named_in_code(page):
        word = word.strip("(),;")
        if word.startswith(OLD_REV + ":") or not writer.FILE_NAME.fullmatch(Path(word).name):
            continue
        if Path(word).name not in kept or ("/" in word and not kept[Path(word).name].as_posix().endswith(word)):
            missing.append(word)
    assert not missing, f"{page.relative_to(REPO)} names results files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_named_benchmark_modules_exist(page):
    modules = set(re.findall(r"\bbenchmarks\.([a-z_]+)\.([a-z_]+)\b", page.read_text()))
    assert not [f"benchmarks.{a}.{b}" for a, b in modules if not (REPO / "benchmarks" / a / f"{b}.py").is_file()]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_named_scripts_exist(page):
    named = set(re.findall(r"\bscripts/[\w\-]+\.(?:sh|py)\b", page.read_text()))
    assert not [s for s in sorted(named) if not (REPO / s).is_file()], f"{page.relative_to(REPO)} names missing scripts"


def git_has(rev_path: str) -> bool:
    try:
        return subprocess.run(["git", "cat-file", "-e", rev_path], cwd=REPO, capture_output=True).returncode == 0
    except OSError:  # no git on this machine
        return False


def test_old_results_are_cited_from_git_only_when_not_kept():
    """docs cite a run that was not kept as 8e5db1a:benchmarks/results/OLD; a kept run (whose notes name its old
    file) is cited by its new name; a bare old name is cited neither way."""
    if not git_has(f"{OLD_REV}:benchmarks/results"):
        pytest.skip(f"no git history with {OLD_REV} (a copy of the tree)")
    converted = set()
    for path in RESULTS.rglob("*.json"):
        converted |= set(re.findall(r"benchmarks/results/[\w.\-]+", json.loads(path.read_text()).get("notes", "")))
    old = subprocess.run(["git", "ls-tree", "--name-only", f"{OLD_REV}:benchmarks/results"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for page in PAGES:
        text = page.read_text()
        for cited in OLD_CITATION.findall(text):
            if not git_has(f"{OLD_REV}:{cited}"):
                bad.append(f"{page.name}: {cited} is not in {OLD_REV}")
            elif cited in converted:
                bad.append(f"{page.name}: {cited} was kept; cite its new name")
        bare = OLD_CITATION.sub("", text)
        bad += [f"{page.name}: bare old name {name}" for name in old if re.search(rf"`{re.escape(name)}`", bare)]
    assert not bad


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_named_source_paths_exist(page):
    named = set(re.findall(r"\bdsv3/[\w/]+\.py\b", page.read_text()))
    assert not sorted(p for p in named if not (REPO / p).is_file())


DOC_CITATION = re.compile(r"\bdocs/([a-z][\w\-]*\.md)(?:#([\w\-]+))?")


def test_docs_cited_by_code_exist():
    """Comments and docstrings point to docs/PAGE.md#anchor for the numbers and references they no longer quote."""
    bad = []
    for folder in ("dsv3", "tests", "benchmarks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for page, anchor in DOC_CITATION.findall(path.read_text()):
                file = REPO / "docs" / page
                if not file.is_file():
                    bad.append(f"{path.relative_to(REPO)}: docs/{page} does not exist")
                elif anchor and anchor not in anchors(file):
                    bad.append(f"{path.relative_to(REPO)}: no heading #{anchor} in docs/{page}")
    assert not bad, bad
