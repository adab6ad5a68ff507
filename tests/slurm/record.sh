#!/usr/bin/env bash
# record.sh DEVICE THREADS SECONDS: print where and how this job ran, as key=value
# lines, sleeping SECONDS in between (so overlapping jobs can be seen).
set -eu
echo "host=$(hostname -s)"
echo "slurm_job_id=${SLURM_JOB_ID:-none}"
echo "slurm_partition=${SLURM_JOB_PARTITION:-none}"
echo "cuda_visible_devices=${CUDA_VISIBLE_DEVICES:-none}"
echo "device=$1"
echo "threads=$2"
echo "start=$(date +%s.%N)"
sleep "$3"
echo "end=$(date +%s.%N)"
