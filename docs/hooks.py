"""MkDocs hooks: the repository files the site includes, and links written for GitHub.

Every Markdown file of the project links the way GitHub resolves links: relative to the file
in the repository (`../benchmarks/README.md` from `docs/guides/`, `docs/guides/serving.md`
from the README). The site also includes files from outside `docs/`: the README (as
`readme.md`), the benchmarks write-up, the MaxText peers page and every results file, each
at its repository path. `on_page_markdown` rewrites each relative link from the repository's
layout to the site's, before MkDocs validates it, so a link that is broken on GitHub is broken
in the site too, and `mkdocs build --strict` fails on it.
"""
from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(os.path.abspath(__file__)).parents[1]  # symlinks kept: a linked copy builds too
DOCS = "docs"
# Repository files outside docs/ that the site includes: repository path -> site path.
INCLUDED_GLOBS = ["benchmarks/README.md", "benchmarks/peers/README.md", "benchmarks/results/*"]
RENAMED = {"README.md": "readme.md"}  # the site's index.md is the landing page
LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\s+\"[^\"]*\")?\)")


def included_files() -> dict[str, str]:
    """repository path -> site path of every repository file outside docs/ in the site."""
    found = dict(RENAMED)
    for pattern in INCLUDED_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file():
                found[path.relative_to(ROOT).as_posix()] = path.relative_to(ROOT).as_posix()
    return found


def site_path(repo_path: str) -> str:
    """Where a repository file is in the site (a path that is not there stays as it is, and
    MkDocs then reports the link as broken)."""
    if repo_path.startswith(DOCS + "/"):
        return repo_path[len(DOCS) + 1:]
    return included_files().get(repo_path, repo_path)


def on_files(files: Files, config) -> Files:
    for repo_path, uri in included_files().items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / repo_path)))
    return files


def repo_path_of(page) -> str:
    return Path(os.path.abspath(page.file.abs_src_path)).relative_to(ROOT).as_posix()


def rewrite_link(target: str, page_repo: str, page_site: str) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target  # a URL, an anchor in the page, or an absolute path
    path, hashmark, anchor = target.partition("#")
    repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo), path))
    new = posixpath.relpath(site_path(repo_target), posixpath.dirname(page_site) or ".")
    return new + hashmark + anchor


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_repo, page_site = repo_path_of(page), page.file.src_uri

    def replace(match: re.Match) -> str:
        return (match.group(1) + rewrite_link(match.group(2), page_repo, page_site)
                + (match.group(3) or "") + ")")

    # Links inside fenced code blocks are code, not links: only the text between fences changes.
    parts = re.split(r"(^```.*?^```[^\n]*$)", markdown, flags=re.S | re.M)
    return "".join(part if part.startswith("```") else LINK.sub(replace, part) for part in parts)
