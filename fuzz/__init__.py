"""Coverage-guided fuzzing of pyvirtio's trust boundaries (docs/fuzzing.md).

Every target in :mod:`fuzz.targets` is a plain function ``target_<name>(data:
bytes) -> None`` that builds the object under test from the bytes, runs it,
and lets only declared :class:`~pyvirtio.errors.PyvirtioError` subclasses
pass; anything else (an unexpected exception, a broken invariant, a hang)
propagates and is a crash. :mod:`fuzz.run` drives them with atheris
(libFuzzer) when it is installed, otherwise with Hypothesis;
:mod:`fuzz.make_corpus` writes the seed corpora in ``fuzz/corpus/``.
"""
