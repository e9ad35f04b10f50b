#!/usr/bin/env bash
# mpirun/mpiexec: NP processes (rank discovery from OpenMPI, MPICH or PMIx variables; the
# master address travels over mpi4py). Add a hostfile and transport options in MPI_ARGS,
# e.g. MPI_ARGS="-hostfile hosts -x NCCL_SOCKET_IFNAME" for OpenMPI.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NP=${NP:?set NP (total processes)}
MPIRUN=${MPIRUN:-mpirun}
run "$MPIRUN" -n "$NP" ${MPI_ARGS:-} "$PYTHON" -m "$GLM_MODULE" "${GLM_ARGS[@]}"
