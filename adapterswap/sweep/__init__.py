"""The step sweep: spec -> engine -> store -> analysis -> report."""
