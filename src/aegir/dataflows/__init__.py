"""Apache Hamilton dataflow modules: every public function is a DAG node named for what it returns."""
