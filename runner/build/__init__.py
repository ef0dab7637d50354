"""Lock and build: every input resolved to a digest, images built hermetically.

Flow: the base image comes from a recipe (:mod:`~runner.build.base_image`: mmdebstrap,
reproducible tar, assembled by :mod:`runner._internal.oci` and pushed over the registry HTTP
API) or a digest reference; wheels are downloaded on the host with their hashes
(:mod:`~runner.build.wheels`); the build context is staged and the Dockerfile template
rendered with StrictUndefined (:mod:`~runner.build.context`); Docker runs the build with no
network and evalrun re-assembles and pushes the result itself (:mod:`~runner.build.image`),
so the manifest digest is a pure function of the locked inputs; :mod:`~runner.build.lock`
ties it together into ``eval.lock.json``; :mod:`~runner.build.reproducibility` rebuilds from
nothing and diffs (see docs/reproducible-images.md). Preprocessing and launch provenance:
:mod:`~runner.build.provenance`.
"""
