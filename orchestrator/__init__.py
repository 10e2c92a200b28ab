"""The control plane (DESIGN §11): a public job API and the server side of the worker protocol (§5), on
Prefect. It keeps no state of its own: every job is a flow run of the ``generate`` flow, its status is that
run's state, its result is the run's persisted result, its progress a progress artifact on the run, and
buffer workers are workers of the ``buffer`` work pool. Restarting it, or running several replicas, loses
nothing and assigns nothing twice (Prefect's state orchestration decides every claim)."""
