#!/usr/bin/env bash
# The packages a bare GPU machine lacks, as files in .whl/ (git-ignored), for scripts/gpu_proof.py
# to install there without a network: Hydra and OmegaConf (with ANTLR's runtime, an sdist upstream,
# built to a wheel here), and the peer packages torchnmf (a wheel) and nmf-torch (an sdist with a
# Cython extension, built there, with setuptools_scm). Python 3.12 wheels; torch is never fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*
py=(--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any --only-binary=:all:)
python -m pip download -q --no-deps "${py[@]}" -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 torchnmf==0.3.5 setuptools-scm==8.1.0
python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
python -m pip download -q --no-deps --no-binary=:all: -d .whl nmf-torch==0.1.1
ls -l .whl
