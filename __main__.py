from vitc.compiler.cli import main

raise SystemExit(main())
