# Shorthands for scripts/dev.sh (which works without make too).
.PHONY: demo test bench info
demo:
	bash scripts/dev.sh demo
test:
	bash scripts/dev.sh test
bench:
	bash scripts/dev.sh setup && .venv/bin/python benchmarks/run.py
info:
	bash scripts/dev.sh setup
