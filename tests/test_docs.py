"""The documentation: a README read in five minutes, and a site (mkdocs.yml, docs/) whose strict build fails on a broken
link, a missing anchor or a page left out of the nav."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_BYTES = 15_000

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """mkdocs build --strict with this config into ``site``: its exit status and everything it printed."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, capture_output=True, text=True, timeout=120)


def test_the_site_builds_strictly(tmp_path):
    run = build(REPO / "mkdocs.yml", tmp_path / "site")
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    assert (tmp_path / "site" / "index.html").is_file(), output


def test_readme_is_read_in_five_minutes():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move the detail into docs/"


def test_every_relative_link_in_the_readme_points_to_a_file():
    targets = LINK.findall(README.read_text(encoding="utf-8"))
    relative = [target for target in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target)]
    assert relative, "the README links to no docs page"
    missing = [target for target in relative if not (REPO / target.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_a_broken_link_fails_the_strict_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "serving.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n",
                    encoding="utf-8")
    run = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = run.stdout + run.stderr
    assert run.returncode != 0, f"a broken link passed the strict build:\n{output}"
    assert "no-such-page.md" in output, output
