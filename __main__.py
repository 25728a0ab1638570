from vitc.compiler.cli.main import main

raise SystemExit(main())
