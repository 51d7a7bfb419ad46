# Build, package and deploy Kybernate. Run as root on Debian 12 (scripts/install-test-deps.sh
# installs what is needed, including buildah and the local bookworm slim base image).
#
#   make build                 release binaries in $(CARGO_TARGET_DIR)/release
#   make images                agent and controller images (buildah, or docker when an
#                              engine answers), tagged $(IMAGE_PREFIX)/NAME:$(TAG)
#   make push REGISTRY=r.example.com/team   tag and push both images to REGISTRY
#   make deploy [REGISTRY=...] kubectl apply of deploy/ with the image names substituted
#   make demo / make test      the README's two commands

CARGO_TARGET_DIR ?= target
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG ?= $(VERSION)
IMAGE_PREFIX ?= kybernate
REGISTRY ?=
IMAGE_REPO := $(if $(REGISTRY),$(REGISTRY),$(IMAGE_PREFIX))
AGENT_IMAGE := $(IMAGE_REPO)/kybernate-agent:$(TAG)
CONTROLLER_IMAGE := $(IMAGE_REPO)/kybernate-controller:$(TAG)
ENGINE := $(shell if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; else echo buildah; fi)
BINARIES := kybernate-agent kybernatectl containerd-shim-kybernate-v1 kybernate-installer kybernate-controller

.PHONY: build images push deploy demo test

build:
	cargo build --release -p kybernate-agent -p containerd-shim-kybernate-v1 \
	  -p kybernate-installer -p kybernate-controller \
	  --bin kybernate-agent --bin kybernatectl --bin containerd-shim-kybernate-v1 \
	  --bin kybernate-installer --bin kybernate-controller

images: build
	IMAGE_PREFIX=$(IMAGE_PREFIX) bash scripts/build-images.sh $(CARGO_TARGET_DIR)/release $(TAG)

push:
	@test -n "$(REGISTRY)" || { echo "make push needs REGISTRY=host[:port]/path" >&2; exit 1; }
	for name in kybernate-agent kybernate-controller; do \
	  $(ENGINE) tag $(IMAGE_PREFIX)/$$name:$(TAG) $(REGISTRY)/$$name:$(TAG) && \
	  $(ENGINE) push $(REGISTRY)/$$name:$(TAG) || exit 1; \
	done

deploy:
	kubectl kustomize deploy/ \
	  | sed -e 's#image: kybernate/kybernate-agent:[^[:space:]]*#image: $(AGENT_IMAGE)#' \
	        -e 's#image: kybernate/kybernate-controller:[^[:space:]]*#image: $(CONTROLLER_IMAGE)#' \
	  | kubectl apply -f -

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh
