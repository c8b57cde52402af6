#!/usr/bin/env bash
# Data-parallel `bapo train` over MPI under Slurm: one rank per GPU, on as many nodes as asked.
#
#   cargo build --release -p bapo-cli --features cuda,mpi     # needs libopenmpi-dev + libclang-dev
#   sbatch scripts/slurm-train.sh configs/default.toml runs/dp
#
# Every rank reads the same config and data (a shared filesystem); rank 0 prepares the caches
# (the others wait), evaluates, logs and writes into the output directory; each rank takes the
# GPU at its node-local rank. The global batch is the config's train.batch_size x grad_accum,
# split between the ranks, so the result does not depend on how many there are.
#SBATCH --job-name=bapo-dp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm-train.sh CONFIG OUTPUT_DIR}
OUT=${2:?usage: sbatch scripts/slurm-train.sh CONFIG OUTPUT_DIR}
BAPO=${BAPO:-target/release/bapo}
export RAYON_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# srun starts the ranks through PMI(x); `mpirun -np $SLURM_NTASKS` works as well with Open MPI.
srun --mpi=pmix "$BAPO" train --config "$CONFIG" --output "$OUT" --mpi --devices cuda:0,cuda:1
