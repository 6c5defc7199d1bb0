//! kiln-runtime: will hold `CompiledModule` (guards and recompilation, memory
//! plan, live hooks between compiled segments), the reference graph
//! interpreter and export/load of compiled graphs. It sits above the
//! frontend (it runs modules and binds their live parameters) and never the
//! other way round. Nothing is implemented yet: the tracing issue brings it.
