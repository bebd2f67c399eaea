# flowalign: the two Quick-start commands are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.flowalign-installed

.PHONY: demo demo-nft demo-video test install clean-venv shapes-base shapes-video-base credit-experiment steer-experiment

# torch first: a CPU build (about 1.6 GB in the venv in all) where pip finds one, e.g. the 2.13.0 CPU wheel this
# project's CI machines carry; set TORCH='torch' (or a CUDA build you have) for another one.
TORCH   ?= torch==2.13.0

# Create the virtualenv and install flowalign with its test extras (about 2 min the first time, ~7 s after).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: GRPO-align the shipped shapes model on this CPU and write runs/shapes_grpo/report.html.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/flowalign train configs/shapes_grpo.yaml

# The same trainer with the DiffusionNFT objective (ODE rollouts, negative-aware flow matching): runs/shapes_nft.
demo-nft: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/flowalign train configs/shapes_nft.yaml

# The video job: Flow-GRPO on the shipped shapes video model (Wan 2.1 DiT on pixels), runs/shapes_video_grpo; it runs
# the video path end to end but does not improve the model yet (docs/results.md).
demo-video: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/flowalign train configs/shapes_video_grpo.yaml

# Rebuild the shipped shapes video model from scratch (docs/shapes.md): two stages, then install it as package data.
# --resume: a run stopped by Ctrl-C or a crash continues from its last checkpoint when the target is run again (a new
# --out starts fresh; a finished stage only re-writes its final/ from its last checkpoint).
shapes-video-base: $(STAMP)
	$(BIN)/flowalign pretrain --config configs/shapes_video_pretrain.yaml --out runs/shapes_video_pretrain --threads 2 --resume
	$(BIN)/flowalign pretrain --config configs/shapes_video_pretrain_stage2.yaml --out runs/shapes_video_pretrain_stage2 --threads 2 --resume
	mkdir -p flowalign/assets/shapes_video
	cp runs/shapes_video_pretrain_stage2/final/config.json runs/shapes_video_pretrain_stage2/final/model.safetensors flowalign/assets/shapes_video/

# Rebuild the shipped shapes base from scratch (docs/shapes.md): stage 1, stage 2, then install it as package data.
# --resume: as for shapes-video-base, running the target again continues an interrupted stage.
shapes-base: $(STAMP)
	$(BIN)/flowalign pretrain --config configs/shapes_pretrain.yaml --out runs/shapes_pretrain --threads 2 --resume
	$(BIN)/flowalign pretrain --config configs/shapes_pretrain_stage2.yaml --out runs/shapes_pretrain_stage2 --threads 2 --resume
	cp runs/shapes_pretrain_stage2/final/config.json runs/shapes_pretrain_stage2/final/model.safetensors flowalign/assets/shapes/

# Credit methods at an equal rollout budget on the shapes world (docs/credit.md): 40 iterations x 64 rollouts each
# (TempFlow `branch`: 2 seeds x 4 children per prompt at one random step, so also 8 final samples per prompt;
# `branch_all`: at all 6 trained steps, 48 final samples per prompt, so 4 prompts x 13 iterations for the same
# budget; `g2rpo`: G²RPO, one seed per prompt, 8 children at each of steps 0-4 (the high-noise half), credit
# summed over completions with strides 1, 2, 3, so 40 final samples per prompt and 4 prompts x 16 iterations;
# `*_full` = full-ODE probes; `euphonium_guided`: rollouts guided by the reward gradient at the trained
# steps, which needs a differentiable training reward such as saturation, so it is not in the default list),
# shapes-bench (120 prompts x 2 seeds) every 10 iterations, then one plot + table in docs/.
# CREDIT_EXTRA adds overrides to every run, CREDIT_TAG names the runs (runs/credit_<TAG><method>), CREDIT_OUT and
# CREDIT_REWARD are where the plot goes and which evaluation reward it compares: the smooth-reward variant is
#   make credit-experiment CREDIT_METHODS="outcome dense_gain_full" CREDIT_TAG=saturation_ \
#     CREDIT_EXTRA="'reward.weights={saturation: 1.0}' 'eval.rewards=[saturation,shapes_strict]'" \
#     CREDIT_OUT=docs/credit_experiment_saturation CREDIT_REWARD=saturation
CREDIT_DEFAULT := outcome dense_gain turning_points value_anchor euphonium branch branch_all dense_gain_full turning_points_full
CREDIT_METHODS ?= $(CREDIT_DEFAULT)
CREDIT_THREADS ?= 2
CREDIT_EXTRA ?=
CREDIT_TAG ?=
# the plot in docs/ is redrawn only by the full default list; a subset draws its own under runs/
ifeq ($(strip $(CREDIT_METHODS)),$(strip $(CREDIT_DEFAULT)))
CREDIT_OUT ?= docs/credit_experiment
else
CREDIT_OUT ?= runs/credit_$(CREDIT_TAG)compare
endif
CREDIT_REWARD ?= shapes_strict
CREDIT_ARGS := train.iterations=40 train.optimizer_steps_per_iter=4 eval.every=10 eval.max_prompts=120 eval.seeds_per_prompt=2 train.ema=false train.checkpoint_every=40
credit-experiment: $(STAMP)
	for m in $(CREDIT_METHODS); do \
	  name=$$m; opts='credit.options={}'; plan=chain; popts='sampler.plan_options={}'; guide=none; gopts='sampler.guide_options={}'; extra=; \
	  case $$m in dense_gain|turning_points) opts='credit.options={probe: "ode:2"}';; \
	    dense_gain_full|turning_points_full) name=$${m%_full}; opts='credit.options={probe: "ode:full"}';; \
	    euphonium) opts='credit.options={pra_probe: x0}';; \
	    euphonium_guided) name=euphonium; guide=reward_grad; gopts='sampler.guide_options={lam: 300.0}';; \
	    branch) plan=branch; popts='sampler.plan_options={children: 4, branch_steps: random}'; \
	            extra='train.group_size=2 train.micro_batch=64 train.optimizer_steps_per_iter=1';; \
	    branch_all) name=branch; plan=branch; popts='sampler.plan_options={children: 4, branch_steps: all}'; \
	            extra='train.group_size=2 train.groups_per_iter=4 train.iterations=13 eval.every=3 train.micro_batch=48 train.optimizer_steps_per_iter=2 train.checkpoint_every=13';; \
	    g2rpo) name=granular; plan=branch; popts='sampler.plan_options={children: 8, branch_steps: all}'; \
	            extra='sampler.train_fraction=0.5 train.group_size=1 train.groups_per_iter=4 train.iterations=16 eval.every=4 train.micro_batch=40 train.optimizer_steps_per_iter=2 train.checkpoint_every=16';; esac; \
	  OMP_NUM_THREADS=$(CREDIT_THREADS) $(BIN)/flowalign train configs/shapes_grpo.yaml $(CREDIT_ARGS) \
	    credit.name=$$name "$$opts" sampler.plan=$$plan "$$popts" sampler.guide=$$guide "$$gopts" $$extra $(CREDIT_EXTRA) \
	    output.run_dir=runs/credit_$(CREDIT_TAG)$$m || exit 1; done
	$(BIN)/flowalign compare $(addprefix runs/credit_$(CREDIT_TAG),$(CREDIT_METHODS)) --out $(CREDIT_OUT) \
	  --reward $(CREDIT_REWARD)

# Steering at equal forwards on shapes-bench (docs/steering.md): all 240 prompts x 2 outputs per run, selecting on
# shapes_partial and scoring shapes_strict; one directory per run, runs/steer_<STEER_TAG><run> (must not exist yet),
# then one line per run and runs/steer_<STEER_TAG>plot.png (the listed runs took 64 min in all as one-thread
# runs, two at a time); e.g.
#   make steer-experiment STEER_RUNS="none bon4_sde fk4_max" STEER_EXTRA="--max-prompts 60" STEER_TAG=small_
STEER_RUNS ?= none none_sde bon2 bon2_sde bon4 bon4_sde bon8 bon8_sde fk2_max fk4_max fk4_diff fk4_lam3 fk4_late fk4_ode2 fk4_drawn fk8_max
STEER_THREADS ?= 2
STEER_EXTRA ?=
STEER_TAG ?=
steer-experiment: $(STAMP)
	for r in $(STEER_RUNS); do \
	  case $$r in none) a='--method none';; none_sde) a='--method none --kernel flow_sde --eta 0.7';; \
	    bon*_sde) k=$${r#bon}; a="--method best_of_n -k $${k%_sde} --kernel flow_sde --eta 0.7";; \
	    bon*) a="--method best_of_n -k $${r#bon}";; \
	    fk4_diff) a='--method fk -k 4 --potential diff';; fk4_lam3) a='--method fk -k 4 --lam 3';; \
	    fk4_late) a='--method fk -k 4 --start 6';; fk4_ode2) a='--method fk -k 4 --probe ode:2';; \
	    fk4_drawn) a='--method fk -k 4 --output drawn';; fk*_max) k=$${r#fk}; a="--method fk -k $${k%_max}";; \
	    *) echo "steer-experiment: unknown run '$$r' (see STEER_RUNS in the Makefile)"; exit 2;; esac; \
	  OMP_NUM_THREADS=$(STEER_THREADS) $(BIN)/flowalign steer --prompt-file shapes-bench --seeds 2 $$a $(STEER_EXTRA) \
	    --out runs/steer_$(STEER_TAG)$$r || exit 1; done
	for r in $(STEER_RUNS); do $(BIN)/python -c "import json, sys; s = json.load(open(sys.argv[2])); \
	  print(f\"{sys.argv[1]:10s} strict {s['overall']['shapes_strict']:.3f}  forwards/image {s['cost']['forwards_per_image']:.0f}\")" \
	  $$r runs/steer_$(STEER_TAG)$$r/summary.json; done
	$(BIN)/flowalign steer --plot $(addprefix runs/steer_$(STEER_TAG),$(STEER_RUNS)) --out runs/steer_$(STEER_TAG)plot.png

# The whole test suite (CPU, offline).
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
