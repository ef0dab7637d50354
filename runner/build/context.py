"""The hermetic build context: hashed wheels, the agent files, the user's context, the Dockerfile.

:class:`BuildInputs` names everything that goes into an image and has one digest over it;
:func:`stage_context` lays those inputs out for ``docker build``, with the template rendered
strictly (every ``FROM`` digest-pinned) and file modes normalized.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta

from runner._internal import oci
from runner._internal.settings import Settings
from runner._internal.tree import TreeDigestFormat, digest_tree, sha256_file
from runner.build.package_files import AGENT_FILES, PACKAGE_DIR, agent_digest
from runner.build.wheels import cached_wheel
from runner.errors import InputError
from runner.model.base import parse_digest_ref
from runner.model.lock import LockedBase, LockedWheel
from runner.model.spec import EvalSpec

# SOURCE_DATE_EPOCH of every evalrun build: file times and image config times.
BUILD_EPOCH = 1735689600


def tree_digest(root: Path) -> str:
    """The build context's digest (``context_sha256``): files, exec bits, content; no links.

    The :attr:`~runner._internal.tree.TreeDigestFormat.BUILD_CONTEXT` layout, bare hex.
    """
    return digest_tree(root, TreeDigestFormat.BUILD_CONTEXT, what="build context")


def render_dockerfile(template: Path, variables: Mapping[str, str | int | bool]) -> str:
    """Render a Dockerfile template strictly; every FROM must be digest-pinned."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template.parent)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - output is a Dockerfile, not HTML
        keep_trailing_newline=True,
    )
    source = template.read_text(encoding="utf-8")
    missing = sorted(jinja2.meta.find_undeclared_variables(env.parse(source)) - variables.keys())
    if missing:
        raise InputError(
            f"template uses undefined variable(s): {', '.join(missing)}",
            file=str(template),
            hint=f"available variables: {sorted(variables)}",
        )
    try:
        text = env.get_template(template.name).render(**variables)
    except jinja2.UndefinedError as exc:
        raise InputError(
            f"template uses an undefined variable: {exc.message}",
            file=str(template),
            hint=f"available variables: {sorted(variables)}",
        ) from None
    except jinja2.TemplateError as exc:
        raise InputError(f"template error: {exc}", file=str(template)) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", line, re.IGNORECASE)
        if match:
            try:
                parse_digest_ref(match[1])
            except ValueError as exc:
                raise InputError(
                    f"rendered Dockerfile line {lineno}: {exc}", file=str(template)
                ) from None
    return text


@dataclass(frozen=True)
class BuildInputs:
    spec: EvalSpec
    spec_dir: Path
    base: LockedBase
    wheels: list[LockedWheel]
    template: Path
    context: Path

    def digest(self) -> str:
        """One digest over everything that goes into the image."""
        h = hashlib.sha256(b"evalrun-build-inputs/v1\n" + oci.ASSEMBLY_SCHEME.encode() + b"\n")
        h.update(self.base.ref.encode() + b"\n")
        for w in self.wheels:
            h.update(f"{w.filename} {w.sha256}\n".encode())
        h.update(sha256_file(self.template).encode() + b"\n")
        h.update(tree_digest(self.context).encode() + b"\n")
        h.update(agent_digest().encode() + b"\n")
        return h.hexdigest()


def build_inputs_for(
    spec: EvalSpec, spec_dir: Path, base: LockedBase, wheels: list[LockedWheel]
) -> BuildInputs:
    assert spec.image.template and spec.image.context  # guaranteed by ImageSpec
    template = (spec_dir / spec.image.template).resolve()
    if not template.is_file():
        raise InputError("image.template: file not found", file=str(template))
    context = (spec_dir / spec.image.context).resolve()
    if not context.is_dir():
        raise InputError("image.context: directory not found", file=str(context))
    return BuildInputs(
        spec=spec, spec_dir=spec_dir, base=base, wheels=wheels, template=template, context=context
    )


def stage_context(inputs: BuildInputs, dest: Path, settings: Settings) -> str:
    """Fill ``dest`` with the hermetic build context; returns the rendered Dockerfile."""
    wheels_dir = dest / "wheels"
    wheels_dir.mkdir(parents=True)
    lines = []
    for wheel in inputs.wheels:
        shutil.copy2(cached_wheel(wheel, settings), wheels_dir / wheel.filename)
        lines.append(f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}")
    (dest / "requirements.lock.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    agent_dir = dest / "agent" / "runner"
    for rel in AGENT_FILES:
        target = agent_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / rel, target)
    shutil.copytree(
        inputs.context,
        dest / "app",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    text = render_dockerfile(
        inputs.template,
        {
            "base_image": inputs.base.ref,
            "spec_name": inputs.spec.metadata.name,
            "inputs_digest": inputs.digest(),
            "source_date_epoch": BUILD_EPOCH,
            "has_wheels": bool(inputs.wheels),
        },
    )
    (dest / "Dockerfile").write_text(text)
    _normalize_modes(dest)
    return text


def _normalize_modes(root: Path) -> None:
    """0755 for directories and executables, 0644 for the rest: the umask must not leak in."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        exe = path.is_dir() or bool(path.stat().st_mode & 0o111)
        path.chmod(0o755 if exe else 0o644)
