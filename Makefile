# The pipeline's entry points. From a fresh clone: `make demo`, then `make test`.
#   make import NAME=.. FROM=.. [ARCH=..] [EVAL=..] [LABELS=..] [TRANSFORM=..] [CODE=..] [VERSION=..]
#               [RUNTIME=onnxruntime|torchscript] [MIN_ACCURACY=0..1] [ALLOW_PICKLE=1] [SPECS=archives]
#               [QUANTIZE=int8 [MAX_DROP=0.01] [MIN_AGREEMENT=0.98] [CALIBRATION=<dir>]]
#                                               bring your own model: spec, build, checks, register (docs/importing.md)
#   make quantize MODEL=.. [VERSION=..] [MAX_DROP=0.01] [MIN_AGREEMENT=0.98] [MIN_COSINE=0.99] [CALIBRATION=<dir>]
#                                               a new INT8 version of VERSION (default: the default), refused when its
#                                               top-1 drops over MAX_DROP or strays from fp32's; registered, not default
#   make archive [MODEL=digits [VERSION=2.0]] [FORCE=1]   build archives into model_store/
#   make serve | stop | status                  TorchServe with every built archive, behind its front door (nginx):
#                                               :8080 inference and /health/*, :8081 management, :8082 metrics
#   make predict                                samples through every model: photos, digits, sentences, an upscaling
#   make models | describe | register | unregister | scale | set-default   MODEL=.. VERSION=.. [MIN=.. MAX=..]
#   make ab MODEL=digits SPLIT="1.0=90 2.0=10" | promote MODEL=.. VERSION=.. [FORCE=1] | rollback MODEL=.. | routes
#   make routes-reset                           A/B splits at the front door
#   make monitor | monitor-stop                 Prometheus scraping TorchServe's metrics (http://127.0.0.1:9090)
#   make load-test [SCENARIO=ClassifierUser|DigitsUser|ABUser|ModelUser MODEL=..] [USERS=16 RATE=4 DURATION=60s]
#   make soak [MINUTES=30] [SOAK_RATE=req/s]    steady load at 70 % of saturation, 1 % bad requests, memory and files
#                                               sampled: growth per hour and errors (load_test/results/soak.*)
#   make bench [SECONDS=10]                     limit vs our TorchServe vs stock handler vs Flask: load_test/results/
#   make bench-runtimes                         every model on TorchScript and on ONNX Runtime, in-process
#   make bench-quantize                         fp32 against INT8: size, speed in-process and served, agreement, top-1
#   make deploy [MODEL=..] [SPLIT="1.0=90 2.0=10"] [IMAGE=..]   Kubernetes, KServe, Dockerfile into deploy/out/
#   make deploy-check                           prove deploy/out/ offline: kubernetes-validate, KServe's rules,
#                                               promtool, kubectl kustomize, hadolint
#   make image [MODEL=a,b] [VERSION=..] [RUNTIME=onnxruntime|torchscript] [EXPLAIN=1] [IMAGE=..] [COMPARE=1]
#                                               the serving image, built here with podman from Debian packages and
#                                               uv.lock (no registry); torch only when a version needs it; prints its
#                                               size and layers. COMPARE=1: the same versions with torch beside it
#   make image-check [MODEL=a,b] [IMAGE=..]     run it as its Deployment says (podman): cold start, probes,
#                                               /predictions and v2 against outside, preStop + SIGTERM, kill -9
#   make rehearse [MODEL=digits] [SPLIT=..]     the Deployment on loopback: 3 replicas behind nginx, a rolling
#           [IMAGE=..]                          update under load (requests lost: must be 0), a crash; with
#                                               IMAGE, the replicas are containers of that image
#   make footprint                              start-up timeline, every process's memory, register → READY, frontend CPU
#   make docs                                   the documentation site (mkdocs.yml, docs/), built strictly into .site/
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY := .venv/bin/python
MODEL ?=
VERSION ?=
MIN ?= 1
MAX ?= 1
SPLIT ?=
SCENARIO ?= ClassifierUser
USERS ?= 16
RATE ?= 4
DURATION ?= 60s
SECONDS ?= 10
PYTEST_ARGS ?=
NAME ?=
FROM ?=
MANAGE := $(PY) -m manage

# What a user sets on the command line reaches the recipes as the environment variable ARG_<name>, exactly as typed
# ($(value): make expands no $ in it), and every recipe quotes it: "$$ARG_NAME". Nothing typed is spliced into a
# command line, so a quote, a space, a $ or a backtick in a name or a file name is never read by the shell.
USER_VARIABLES := NAME FROM ARCH ARGS TASK EVAL LABELS LABEL_ORDER TRANSFORM CODE VERSION RUNTIME MIN_ACCURACY ALLOW_PICKLE SPECS \
                  QUANTIZE MAX_DROP MIN_AGREEMENT MIN_COSINE CALIBRATION \
                  MODEL SPLIT \
                  IMAGE MIN MAX FORCE SCENARIO USERS RATE DURATION SECONDS MINUTES SOAK_RATE
$(foreach v,$(USER_VARIABLES),$(eval export ARG_$(v) := $$(value $(v))))
# "$${ARG_X:+--x "$$ARG_X"}": the option and its value when X is set, nothing when it is not
option = $${ARG_$(1):+--$(2) "$$ARG_$(1)"}

.PHONY: help install import quantize archive serve stop status samples predict test demo clean \
        models describe register unregister scale set-default ab promote rollback routes routes-reset \
        monitor monitor-stop load-test soak bench footprint bench-runtimes bench-quantize deploy deploy-check \
        rehearse image image-check docs

help:
	@sed -n '/^[^#]/q;s/^# \{0,1\}//p' Makefile

# install.sh: the Debian packages the toolkit and its tests drive (nginx, Prometheus, wrk, npm), uv, and the Python
# packages exactly as uv.lock pins them. Quick when everything is there.
install:
	@./install.sh

# make import: every optional variable becomes the command line's option of the same name, when given.
IMPORT_OPTIONS := $(foreach v,ARCH ARGS TASK EVAL LABELS LABEL_ORDER TRANSFORM CODE VERSION RUNTIME MIN_ACCURACY SPECS \
                    QUANTIZE MAX_DROP MIN_AGREEMENT MIN_COSINE CALIBRATION,\
                    $(call option,$(v),$(subst _,-,$(shell echo $(v) | tr A-Z a-z)))) \
                  $${ARG_ALLOW_PICKLE:+--allow-pickle}
import: install
	@test -n "$$ARG_NAME" -a -n "$$ARG_FROM" || { echo "usage: make import NAME=<model> FROM=<path> [ARCH=..] [EVAL=..] ..." >&2; exit 2; }
	$(MANAGE) import "$$ARG_NAME" "$$ARG_FROM" $(IMPORT_OPTIONS)

# make quantize: the model's VERSION (default: its default version) quantized to INT8 as a new version (export/quantize.py).
quantize: install
	@test -n "$$ARG_MODEL" || { echo "usage: make quantize MODEL=<model> [VERSION=..] [MAX_DROP=0.01] [MIN_AGREEMENT=0.98] [MIN_COSINE=0.99] [CALIBRATION=<dir>]" >&2; exit 2; }
	$(MANAGE) quantize "$$ARG_MODEL" $(call option,VERSION,version) $(call option,MAX_DROP,max-drop) \
	    $(call option,MIN_AGREEMENT,min-agreement) $(call option,MIN_COSINE,min-cosine) \
	    $(call option,CALIBRATION,calibration) $(call option,SPECS,specs)

archive: install
	$(PY) build_mar.py $(call option,MODEL,model) $(call option,VERSION,version) $${ARG_FORCE:+--force}

serve: archive
	./serve.sh start

stop:
	./serve.sh stop

status:
	./serve.sh status

samples: install
	@$(PY) -m export.sample_files samples >/dev/null

predict: samples
	$(PY) -m manage samples

models:
	@$(MANAGE) list

describe:
	@$(MANAGE) describe "$$ARG_MODEL" $${ARG_VERSION:+"$$ARG_VERSION"}

register:
	@$(MANAGE) register "$$ARG_MODEL" "$$ARG_VERSION"

unregister:
	@$(MANAGE) unregister "$$ARG_MODEL" "$$ARG_VERSION"

scale:
	@$(MANAGE) scale "$$ARG_MODEL" "$$ARG_VERSION" --min "$$ARG_MIN" --max "$$ARG_MAX"

set-default:
	@$(MANAGE) set-default "$$ARG_MODEL" "$$ARG_VERSION"

ab:
	@$(MANAGE) ab "$$ARG_MODEL" "$$ARG_SPLIT"

promote:
	@$(MANAGE) promote "$$ARG_MODEL" "$$ARG_VERSION" $${ARG_FORCE:+--force}

rollback:
	@$(MANAGE) rollback "$$ARG_MODEL"

routes:
	@$(MANAGE) routes

routes-reset:
	@$(MANAGE) routes-reset

# Prometheus (Debian's package) with monitoring/prometheus.yml; data in monitoring/data/.
monitor: install
	@$(PY) -m monitoring.prometheus start

monitor-stop:
	@$(PY) -m monitoring.prometheus stop

# Locust against the running TorchServe (ABUser: through the A/B proxy); CSV and HTML in load_test/results/.
load-test: samples
	@mkdir -p load_test/results
	$(PY) -m locust -f load_test/locustfile.py --headless --users "$$ARG_USERS" --spawn-rate "$$ARG_RATE" \
	    --run-time "$$ARG_DURATION" --csv "load_test/results/$$ARG_SCENARIO" \
	    --html "load_test/results/$$ARG_SCENARIO.html" --only-summary "$$ARG_SCENARIO"

# Against the running server (started first if it is not).
soak: serve
	$(PY) -m load_test.soak --minutes "$${ARG_MINUTES:-30}" $(call option,SOAK_RATE,rate)

# Starts its own servers on free ports; run it on a quiet machine (about 10 minutes with SECONDS=10).
bench: archive
	$(PY) -m load_test.bench --seconds "$$ARG_SECONDS"

footprint: archive
	$(PY) -m load_test.footprint

bench-runtimes: install
	$(PY) -m load_test.runtimes

bench-quantize: archive
	$(PY) -m load_test.quantized

# The split comes from the running front door when it routes the model, else from SPLIT (with MODEL).
deploy: archive
	$(PY) -m deploy $(call option,MODEL,model) $(call option,SPLIT,split) $(call option,IMAGE,image)

deploy-check: deploy
	$(PY) -m deploy check

# make image: EXPLAIN=1 and COMPARE=1 are read from the environment (make exports what its command line gives), like
# the ARG_ variables: quoted, never spliced into the command line.
image: archive
	$(PY) -m deploy image $(call option,MODEL,model) $(call option,VERSION,version) $(call option,RUNTIME,runtime) \
	    $(call option,IMAGE,image) $${EXPLAIN:+--explanations} $${COMPARE:+--compare}

image-check: image
	$(PY) -m deploy image-check $(call option,MODEL,model) $(call option,IMAGE,image)

rehearse: archive
	$(PY) -m deploy.rehearsal --model "$${ARG_MODEL:-digits}" $(call option,SPLIT,split) $(call option,IMAGE,image)

test: archive
	$(PY) -m pytest $(PYTEST_ARGS)

docs: install
	$(PY) -m mkdocs build --strict

demo: serve predict
	@echo
	@echo "TorchServe is running. Try:"
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token inference)" -T samples/chelsea.jpg http://127.0.0.1:8080/predictions/efficientnet_lite0'
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token inference)" -F data=@samples/coffee.jpg http://127.0.0.1:8080/predictions/efficientnet_lite0'
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token inference)" -T samples/digit.png http://127.0.0.1:8080/predictions/digits/1.0'
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token inference)" -H "Content-Type: application/json" -d @samples/sentences.json http://127.0.0.1:8080/predictions/minilm'
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token inference)" -T samples/chelsea_small.png -o chelsea_x2.png http://127.0.0.1:8080/predictions/super_resolution'
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token inference)" -T samples/chelsea.jpg http://127.0.0.1:8080/explanations/efficientnet_lite0'
	@echo '  curl -H "Authorization: Bearer $$(./serve.sh token management)" http://127.0.0.1:8081/models/digits/all'
	@echo '  curl http://127.0.0.1:8082/metrics'
	@echo '  make stop'

clean:
	-./serve.sh stop
	-$(PY) -m monitoring.prometheus stop
	rm -rf model_store/*.mar model_store/manifest.json logs .serve .pytest_cache samples monitoring/data
