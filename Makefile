# Fuzzing (docs/fuzzing.md). Engine: atheris when installed (pip install -e '.[fuzz]'), else Hypothesis.
#
#   make fuzz         every target for FUZZ_SECONDS (default 600) each, FUZZ_JOBS (2) at a time;
#                     the results table goes into docs/fuzzing.md
#   make fuzz-short   every target for FUZZ_SHORT_SECONDS (default 10) each (a smoke run)
#   make fuzz-corpus  rewrite the seed corpus (fuzz/corpus/) from fuzz/make_corpus.py
#   make fuzz-ci      the CI subset: pytest tests/test_fuzz_short.py (seeds + 3 s of Hypothesis per target)
#   make fuzz-TARGET  one target, e.g. make fuzz-server FUZZ_SECONDS=60

PYTHON ?= python
FUZZ_SECONDS ?= 600
FUZZ_SHORT_SECONDS ?= 10
FUZZ_JOBS ?= 2
FUZZ_ENGINE ?= auto
FUZZ_TARGETS := vu_decode_request vu_parse_reply vu_backend_channel split_reap fixed_reap device_pop \
	blk_handle scsi_handle net_handle spec_parsers blk_driver scsi_driver net_driver server

.PHONY: fuzz fuzz-short fuzz-corpus fuzz-ci fuzz-report

fuzz:
	@status=0; $(MAKE) --no-print-directory -k -j$(FUZZ_JOBS) $(addprefix fuzz-run-,$(FUZZ_TARGETS)) \
		RUN_SECONDS=$(FUZZ_SECONDS) RUN_RESULTS=fuzz/results || status=$$?; \
	$(PYTHON) -m fuzz.run --report --update-docs --results fuzz/results; exit $$status

fuzz-short:
	@status=0; $(MAKE) --no-print-directory -k -j$(FUZZ_JOBS) $(addprefix fuzz-run-,$(FUZZ_TARGETS)) \
		RUN_SECONDS=$(FUZZ_SHORT_SECONDS) RUN_RESULTS=fuzz/results-short || status=$$?; \
	$(PYTHON) -m fuzz.run --report --results fuzz/results-short; exit $$status

fuzz-run-%:
	$(PYTHON) -m fuzz.run $* --seconds $(RUN_SECONDS) --engine $(FUZZ_ENGINE) --keep-going --results $(RUN_RESULTS)

$(addprefix fuzz-,$(FUZZ_TARGETS)):
	$(PYTHON) -m fuzz.run $(@:fuzz-%=%) --seconds $(FUZZ_SECONDS) --engine $(FUZZ_ENGINE) --keep-going

fuzz-corpus:
	$(PYTHON) -m fuzz.make_corpus

fuzz-ci:
	$(PYTHON) -m pytest tests/test_fuzz_short.py -q

fuzz-report:
	$(PYTHON) -m fuzz.run --report --results fuzz/results
