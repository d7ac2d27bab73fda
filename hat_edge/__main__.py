from hat_edge.cli import main

raise SystemExit(main())
