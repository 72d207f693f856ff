// A DOM for React Testing Library in Node (happy-dom), registered before anything imports React's DOM renderer.
// Only the document and window: Node's own timers and microtasks stay, as the SDK uses them.

import { GlobalRegistrator } from '@happy-dom/global-registrator'

GlobalRegistrator.register({ url: 'http://localhost/' })
// React warns about updates outside act() unless told that this is a test environment.
;(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true
